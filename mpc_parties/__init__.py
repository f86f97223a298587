"""The party processes of every route (MPC, HE, EE; the package keeps the user's name): the
server's front door and per-session workers, the dealer, the client's dialing, party configs
(TOML) and the local launcher."""
