"""The language service (OpenAI API, engine, encoder client)."""
