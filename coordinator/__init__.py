"""Coordinator: owns each request's tokens and rounds; routes to the draft and target workers."""
