"""lora_cli."""
