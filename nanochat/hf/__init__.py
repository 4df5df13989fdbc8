"""Hugging Face `transformers` support files for exported nanochat models, loaded with trust_remote_code=True."""
# scripts/export.py copies configuration_nanochat.py and modeling_nanochat.py next to the weights.
# They import only torch and transformers, never nanochat: they run wherever the exported folder
# goes, on machines where nanochat is not installed. Keep it that way when editing them (and keep
# modeling_nanochat.py computing exactly what nanochat/gpt.py computes: tests/test_export.py checks).
