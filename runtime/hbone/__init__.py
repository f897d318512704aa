"""HBONE over trio: the connection driver (`io`) and the client pool (`pool`); the codec they
drive is `veil.core.hbone`."""
