"""`splitvl bench serve`: a load generator for any OpenAI-compatible chat endpoint (ours, vLLM,
SGLang), so one tool compares servers on the same hardware. It is a client only: nothing here
imports the server's code.

dataset.py builds the requests, client.py sends one and times it, load.py paces many (closed
loop at a concurrency, or open loop at a request rate), report.py turns the timings into the
figures users judge a server by (TTFT, TPOT, ITL, latency, throughput, goodput), and cli.py is
the command.
"""
