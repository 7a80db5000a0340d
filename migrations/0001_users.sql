-- The example store: one row per user, and the outbox of change events that
-- WatchUsers on every replica reads (LISTEN/NOTIFY carries only its seq).

-- COLLATE "C": ids sort by their bytes, as the in-memory store's BTreeMap
-- does, whatever the cluster's locale.
CREATE TABLE users (
    user_id      text COLLATE "C" PRIMARY KEY,
    display_name text NOT NULL,
    email        text NOT NULL,
    roles        text[] NOT NULL DEFAULT '{}',
    -- Microseconds since the Unix epoch, as PostgreSQL keeps them.
    create_time  timestamptz NOT NULL,
    update_time  timestamptz NOT NULL
);

-- Written in the transaction of each change; `payload` is the encoded
-- user.v1.UserEvent (a NOTIFY payload must stay under 8000 bytes, a user
-- need not). Trimmed on a schedule once every listener has read it.
CREATE TABLE user_events (
    seq        bigserial PRIMARY KEY,
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX user_events_created_at ON user_events (created_at);
