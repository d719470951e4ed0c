"""The language service (OpenAI API, engine, encoder client). Built in issue 5."""
