"""What the tests share besides fixtures: a client of the API, peers that misbehave on purpose,
and the test stack (cli.stack.Stack with test settings)."""
