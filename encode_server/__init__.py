"""The encode service (vision tower, preprocessing, batching, cache). Built in issue 4."""
