"""`python -m lora_cli ...` (how the torchrun launcher re-invokes `train` in each worker)."""

from lora_cli import orphans

orphans.arm_worker()  # first: torchrun may die during the imports below

from lora_cli.main import main  # noqa: E402

main()
