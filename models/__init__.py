"""Torch modules and checkpoint loading for Qwen2-MoE, Qwen3-MoE and Qwen3-VL-MoE.

No serving code lives here: no HTTP, no zmq.
"""
