"""Incidents remember when their alerts cleared; incidents are indexed by device.

``incidents.cleared_ms`` is when every alert of the incident had cleared; the index on
``incidents.device_id`` keeps the intake's candidate query from reading every open incident of
a district.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 17:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table('incidents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cleared_ms', sa.BigInteger(), nullable=True))
        batch_op.create_index('ix_incidents_device_id', ['device_id'], unique=False)


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table('incidents', schema=None) as batch_op:
        batch_op.drop_index('ix_incidents_device_id')
        batch_op.drop_column('cleared_ms')
