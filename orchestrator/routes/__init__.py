"""The control plane's HTTP routes, one module per audience: `jobs` for people (the CLI),
`worker` for workers reporting on their attempt."""
