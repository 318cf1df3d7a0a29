"""The auth database's schema, as numbered migrations (SQLite's `user_version` counts them).

Its own module, importing nothing, so reconfigure can ask "is the schema current?"
without loading the service's data layer and password hashing.
"""

MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema.
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        admin INTEGER NOT NULL DEFAULT 0,
        blocked INTEGER NOT NULL DEFAULT 0,
        credentials_version INTEGER NOT NULL DEFAULT 1,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE projects (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        visibility TEXT NOT NULL CHECK (visibility IN ('private', 'internal', 'public')),
        registry_enabled INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE memberships (
        project_id INTEGER NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
        user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        role TEXT NOT NULL
            CHECK (role IN ('guest', 'reporter', 'developer', 'maintainer', 'owner')),
        PRIMARY KEY (project_id, user_id)
    );
    CREATE INDEX memberships_user ON memberships (user_id);
    CREATE TABLE personal_access_tokens (
        id INTEGER PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        token_digest TEXT NOT NULL UNIQUE,
        scopes TEXT NOT NULL,
        expires_at INTEGER,
        revoked INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE deploy_tokens (
        id INTEGER PRIMARY KEY,
        project_id INTEGER NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        username TEXT UNIQUE,
        token_digest TEXT NOT NULL UNIQUE,
        scopes TEXT NOT NULL,
        expires_at INTEGER,
        revoked INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE refresh_tokens (
        token_digest TEXT PRIMARY KEY,
        user_id INTEGER REFERENCES users (id) ON DELETE CASCADE,
        personal_access_token_id INTEGER
            REFERENCES personal_access_tokens (id) ON DELETE CASCADE,
        deploy_token_id INTEGER REFERENCES deploy_tokens (id) ON DELETE CASCADE,
        credentials_version INTEGER NOT NULL,
        client_id TEXT,
        expires_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE failed_signins (
        subject TEXT PRIMARY KEY,
        window_start INTEGER NOT NULL,
        failures INTEGER NOT NULL
    );
    """,
    # 2: quotas, the registry's events (push and pull history), and the bytes pushes
    # brought since the usage figures were last computed from storage.
    """
    ALTER TABLE projects ADD COLUMN quota_bytes INTEGER;
    CREATE TABLE registry_events (
        id INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        action TEXT NOT NULL CHECK (action IN ('push', 'pull', 'delete')),
        repository TEXT NOT NULL,
        tag TEXT,
        digest TEXT,
        media_type TEXT,
        size INTEGER,
        actor TEXT,
        address TEXT,
        user_agent TEXT,
        at REAL NOT NULL
    );
    CREATE INDEX registry_events_history ON registry_events (repository, action, id);
    CREATE INDEX registry_events_digest ON registry_events (repository, digest, action, id);
    CREATE TABLE usage_pending (
        project TEXT NOT NULL,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (project, digest)
    );
    """,
    # 3: immutable and protected tags (appliance/auth/tag_rules.py): each project's rules,
    # and the reservation of an immutable tag's first push, whose unique key lets exactly
    # one of two concurrent first pushes (with different digests) through.
    """
    CREATE TABLE tag_rules (
        project_id INTEGER NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('immutable', 'protected')),
        pattern TEXT NOT NULL,
        role TEXT CHECK (role IS NULL OR role IN ('developer', 'maintainer', 'owner', 'admin')),
        position INTEGER NOT NULL,
        PRIMARY KEY (project_id, kind, pattern)
    );
    CREATE TABLE tag_reservations (
        repository TEXT NOT NULL,
        tag TEXT NOT NULL,
        digest TEXT NOT NULL,
        reserved_at REAL NOT NULL,
        PRIMARY KEY (repository, tag)
    );
    """,
    # 4: retention policies (appliance/retention.py), one per project. Portable SQL (it
    # runs on PostgreSQL too): the --keep patterns as a JSON list in TEXT, ages in
    # seconds, times as whole seconds since the epoch.
    """
    CREATE TABLE retention_policies (
        project_id INTEGER PRIMARY KEY REFERENCES projects (id) ON DELETE CASCADE,
        keep_last INTEGER CHECK (keep_last IS NULL OR keep_last >= 0),
        keep_patterns TEXT NOT NULL,
        older_than_seconds INTEGER CHECK (older_than_seconds IS NULL OR older_than_seconds > 0),
        pulled_within_seconds INTEGER
            CHECK (pulled_within_seconds IS NULL OR pulled_within_seconds > 0),
        max_delete INTEGER CHECK (max_delete IS NULL OR max_delete >= 0),
        updated_at INTEGER NOT NULL
    );
    """,
    # 5 (the web interface; put last at a merge, whatever its number then): sessions of
    # the pages, each bound to the user's credentials_version (a password change, block
    # or unblock ends it) and carrying its CSRF token and the notice the next page shows;
    # a user's display name and a project's description, free text the pages show.
    """
    CREATE TABLE web_sessions (
        token_digest TEXT PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        credentials_version INTEGER NOT NULL,
        csrf_token TEXT NOT NULL,
        notice TEXT,
        created_at INTEGER NOT NULL,
        seen_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    );
    CREATE INDEX web_sessions_user ON web_sessions (user_id);
    ALTER TABLE users ADD COLUMN display_name TEXT NOT NULL DEFAULT '';
    ALTER TABLE projects ADD COLUMN description TEXT NOT NULL DEFAULT '';
    """,
)
