"""`python -m triton_local`: run a local Triton over model_repository/ until interrupted."""

from triton_local.runner import get_args_parser, main

raise SystemExit(main(get_args_parser().parse_args()))
