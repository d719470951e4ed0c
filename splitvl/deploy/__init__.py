"""`splitvl up`: one command that runs both services on this host.

config.py   the deployment file's schema (top-level choices + `encode:` and `language:` sections)
plan.py     config -> each service's own settings, addresses and health URLs
tiny.py     the cached demo checkpoint served when no model is given
launcher.py starts the services, waits until both are healthy, stops both on Ctrl-C
child.py    each service's entry: dies with the launcher, then runs `splitvl encode|language`
"""
