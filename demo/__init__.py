"""The tiny CPU world (synthetic tasks, tiny models, traces, warm start, report), installed as sophiavl.demo."""
