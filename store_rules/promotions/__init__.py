"""Promotions: templates, drafts from rules, approval, publishing to tills, execution."""
