"""Example services for the mesh: small aiohttp apps with no sidecar code in them.

The seed topology, each app on 127.0.0.1:8000 behind its own sidecar:

    edge (client) -> healthcare-api -> insurance-verification -> compliance-monitor
                                    -> billing-engine         -> compliance-monitor

Run one with `python -m deploy.apps.<module>` (`healthcare_api`,
`insurance_verification`, `billing_engine`, `compliance_monitor`); the
`client` module drives encounters from the edge. All patient data is fake.
"""
