"""Flask blueprints: CDS Hooks endpoints, health. The only service package that imports Flask."""
