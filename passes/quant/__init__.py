"""Pure quantization math (RTN, GPTQ, AdaDim, outliers): NumPy, no graph code."""
