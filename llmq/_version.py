"""The version of llmq, in one place that any module can read without importing the package face."""

__version__ = "0.1.0"
