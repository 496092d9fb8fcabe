"""lora_runtime."""
