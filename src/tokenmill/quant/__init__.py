"""Integer weight formats: tokenmill's int8/int4 checkpoints, AWQ and GPTQ checkpoints.

- grouped.py      GroupedInts: one matrix as integer codes, scales and zero points (the
                  common form every layout below is read into and written from)
- layouts.py      the checkpoint layouts (AutoAWQ GEMM, GPTQ v1/v2, tokenmill int8) <-> GroupedInts
- config.py       `quantization_config` in config.json: read and validated, or written
- ggml_blocks.py  GroupedInts -> a StoredWeight in a CPU kernel format (Q4_0, Q4_1, Q8_0)
- checkpoint.py   a quantized safetensors checkpoint -> (name, StoredWeight | float tensor)
- rtn.py          round-to-nearest quantizers (int8 per channel, int4 per group)
- awq.py          activation-aware scales (AWQ): statistics, grid search, folding
- calibration.py  layer-input statistics captured by running the float model
- convert.py      `tokenmill quantize`: source checkpoint -> quantized checkpoint directory
- hf_files.py     config.json and tokenizer files for a GGUF source
"""
