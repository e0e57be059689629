"""Kiln's Kopf operator: TrainingJob -> Job, ModelDeployment -> Deployment + Service (+ HPA).

Layers: `settings` (configuration), `names` (deterministic names and labels), `render` (pure manifest
builders from Jinja2 templates), `status` (pure status derivation), `aiokube` (the handlers' API calls,
over aiohttp), `kube` (credentials, resource paths and the blocking calls made at startup),
`handlers/` (one Kopf module per CRD), `main` (the `kiln operator` entry point).
"""
