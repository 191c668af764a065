"""Datasets: reading uploaded archives safely, normalising images, validation reports, and computed
conditioning images.
"""
