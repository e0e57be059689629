"""Kiln's Kopf operator: TrainingJob -> Job, ModelDeployment -> Deployment + Service (+ HPA).

One folder per resource, the same shape for both:
  `trainingjob/`, `modeldeployment/`   `render` (pure builders of the children), `status` (pure status
                                       derivation), `controller` (the handlers, as a class, and `register`)
Shared below them: `podspec` (security contexts, resources, tolerations, owner references, PVC URIs),
`podstatus` (start-failure reasons, what a pod's status says is wrong), `conditions` (times and status
conditions), `templating` (Jinja2 templates rendered once into dicts), `runtime` (watch caches, status
writer, events, resync), `names`, `settings`, and the API clients: `aiokube` (async, the controllers)
and `kube` (blocking, the CLI and tests). `main` is the `kiln operator` entry point.
"""
