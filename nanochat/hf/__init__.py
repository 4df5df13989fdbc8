"""
Hugging Face `transformers` support files for exported nanochat models (scripts/export.py copies
configuration_nanochat.py and modeling_nanochat.py next to the weights; they load with
trust_remote_code=True). They import only torch and transformers, never nanochat, because they
run wherever the exported folder goes.
"""
