"""Base models: the allow-list (torch-free), real-size architectures as configs, the loader, and the
built-in tiny bases.
"""
