"""`python -m lora_cli ...` (how the torchrun launcher re-invokes `train` in each worker)."""

from lora_cli.main import main

main()
