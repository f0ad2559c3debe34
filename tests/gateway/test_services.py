"""The service fixtures give real, shared servers: what one connection writes, another reads."""

from __future__ import annotations

import uuid

import psycopg
import redis


def test_redis_is_empty_and_shared_between_connections(clean_redis):
    with redis.Redis.from_url(clean_redis) as a, redis.Redis.from_url(clean_redis) as b:
        assert a.dbsize() == 0  # clean_redis flushed whatever earlier tests left
        assert a.set("greeting", "hello")
        assert b.get("greeting") == b"hello"


def test_postgres_commits_are_visible_to_another_connection(postgres_url):
    # A unique name: the database lives for the whole session, shared with other tests.
    table = f"probe_{uuid.uuid4().hex}"
    # The reader autocommits: an open read transaction would hold a lock that blocks DROP.
    writer = psycopg.connect(postgres_url)
    reader = psycopg.connect(postgres_url, autocommit=True)
    with writer, reader:
        assert writer.execute("SELECT current_database()").fetchone() == ("tokenmill",)
        writer.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text NOT NULL)")
        writer.execute(f"INSERT INTO {table} VALUES (1, 'one'), (2, 'two')")
        writer.commit()
        rows = reader.execute(f"SELECT id, name FROM {table} ORDER BY id").fetchall()
        assert rows == [(1, "one"), (2, "two")]
        writer.execute(f"DROP TABLE {table}")
        writer.commit()
