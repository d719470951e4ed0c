"""The language service's HTTP process: OpenAI-compatible routes in front of the engine process.

Life of a request: app.py reads and validates the body (schemas.py), chat.py renders the
messages with the checkpoint's chat template and turns image parts into ImageRefs (images.py),
sampling.py builds the engine's SamplingParams, and serve_chat.py / serve_completions.py start
one Generation per choice. Each Generation (generation.py) sends its GenerateRequest through the
EngineClient (engine_client.py) and turns the token stream into text (detokenizer.py, stop.py);
serving.py merges the choices into one JSON body or an SSE stream and aborts engine work when
the client leaves.
"""
