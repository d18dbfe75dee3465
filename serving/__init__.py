"""The llm-platform serving image: an OpenAI-compatible inference server with continuous batching."""
