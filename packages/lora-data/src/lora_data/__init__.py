"""lora_data."""
