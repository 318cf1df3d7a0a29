"""The appliance's registry token service: users, projects, roles, tokens and the
`/jwt/auth` endpoint the registry sends clients to."""
