"""cer's own lazy-pages server: what answers an unmodified ``criu restore --lazy-pages`` in place of
``criu lazy-pages`` (cer.lazy.server), the pages it serves (cer.lazy.pages) and the working sets it records
and serves first (cer.lazy.working_set)."""
