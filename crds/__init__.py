"""The CRD YAML files, packaged as `kiln.crds` so the CLI validates with the very same schemas."""
