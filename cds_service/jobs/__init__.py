"""Durable jobs and results: SQLite by default (Celery + Redis + PostgreSQL when scaled out)."""
