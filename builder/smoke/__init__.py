"""Smoke serving: install a stack's wheels, start a real server, prove it answers, measure it.

Modules:
- config: the [smoke] schema (SmokeConfig, Profile, Canary, Bench, Gate, ContainerSpec) and load_smoke_config;
  also the build output types (Wheel, BuildOutput).
- runtime: cached venvs, host processes and their process trees, ports.
- container: the container image (Dockerfile, build, cache) and serving in it through the Docker SDK.
- client: the HTTP client for an OpenAI-compatible server and its timed completions.
- checks: readiness (wait_ready) and the checks made against a live server.
- metrics: benchmarks, metrics, gates and baseline comparison.
- run: a whole run — reading the build, preparing, starting, checking, recording (run_smoke, serve).
"""
