"""Recipes: the schema, `key=value` overrides and the reference renderer."""
