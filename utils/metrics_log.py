"""Per-step metrics to metrics.jsonl and TensorBoard (and Weights & Biases when asked), rank 0 only."""
import json
import os


def drop_steps_after(path: str, step: int) -> None:
    """On resume, forget what steps after the checkpoint logged before a crash: they are redone."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


class MetricsLogger:
    def __init__(self, output_dir: str, *, enabled: bool, resume_step: int = 0, wandb_project: str | None = None,
                 run_config: dict | None = None):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        self._drop_steps_after(resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=resume_step + 1)
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, config=run_config, resume="allow")

    def _drop_steps_after(self, step: int) -> None:
        for path in (self.path, os.path.join(os.path.dirname(self.path), "samples.jsonl")):
            drop_steps_after(path, step)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def log_samples(self, step: int, prompt: str, samples: list[dict]) -> None:
        """Sample completions with their rewards: samples.jsonl and TensorBoard's text tab."""
        if not self.enabled:
            return
        with open(os.path.join(os.path.dirname(self.path), "samples.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "prompt": prompt, "samples": samples}, ensure_ascii=False) + "\n")
        text = "\n\n".join(f"R^o={s['outcome']:.2f} R^t={s['thinking']:.2f} R={s['reward']:.2f}\n{s['completion']}"
                           for s in samples)
        self.tensorboard.add_text("samples", f"{prompt}\n\n{text}", step)

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
