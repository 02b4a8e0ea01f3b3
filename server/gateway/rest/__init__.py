"""The HTTP/JSON API beside gRPC: its routes, its fields, its OpenAPI description and its page."""
