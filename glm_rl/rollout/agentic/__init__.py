"""Agentic, multi-turn rollouts (issue 18): GLM-4.5's tool-call format (`glm45_format`), Python tools and their
registry (`tools`), the code sandbox (`sandbox`), and the built-in tool loop (`tool_loop.generate`, a
`--custom-generate-function-path` hook that keeps trajectories token-exact)."""
