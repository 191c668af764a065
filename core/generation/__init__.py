"""Generations: request params, the artifact context that applies and undoes adapters, input images,
the queue's doorbell, and inference.
"""
