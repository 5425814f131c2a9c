"""services/llm."""
