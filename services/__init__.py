"""The five services of miles. Each imports only the `miles` library, never another service."""
