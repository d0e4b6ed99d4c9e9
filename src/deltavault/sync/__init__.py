"""Mirror a directory tree (optionally from a point-in-time snapshot) with delta transfer."""
