"""Development tools for extproc: the local stack, the fake vLLM, the benchmark, the null ext_proc.

None of this ships in the runtime package or its image: `extproc serve` never imports it.
The `extproc` command finds these subcommands through the `extproc.commands` entry points
this distribution declares, so a development install gets `extproc dev` and `extproc bench`.
"""
