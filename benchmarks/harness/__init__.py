"""What every benchmark shares: ``timing`` (interleaved rounds, summaries, ratios, CPU-load checks,
environment, result files) and ``peers`` (the peers venv runner). Importing it loads neither torch
nor onnxruntime."""
