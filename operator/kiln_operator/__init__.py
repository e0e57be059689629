"""Kiln's Kopf operator: TrainingJob -> Job, ModelDeployment -> Deployment + Service (+ HPA).

One folder per resource, the same shape for both:
  `trainingjob/`, `modeldeployment/`   `render` (pure builders of the children), `status` (pure status
                                       derivation), `controller` (the handlers, as a class, and `register`)
Shared below them: `podspec` (security contexts, resources, tolerations, owner references, PVC URIs),
`podstatus` (start-failure reasons, what a pod's status says is wrong), `conditions` (times and status
conditions), `templating` (Jinja2 templates rendered once into dicts), `runtime` (watch caches, status
writer, events, resync), `names` and `settings`. API calls go through the shared core's one client,
`kiln.kube` (async in the controllers, its blocking shim at startup). `main` is the `kiln operator` entry point.
"""
