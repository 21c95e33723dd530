"""`python -m stepopsd.envs.search.retrieval`: the `stepopsd-retriever` command (`service.main`); the run's own
server (`service.LocalRetrieverServer`) is started this way."""
import sys

from stepopsd.envs.search.retrieval.service import main

sys.exit(main())
