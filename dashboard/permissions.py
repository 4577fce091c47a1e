"""Who may see and do what: the one place that answers it, for a signed-in person or a till.

Routes ask it before they read or change anything; templates ask it (as `may`, see
`dashboard.rendering`) before they show a link, a row, a button or a customer's name, so a rule
changes here and nowhere else.

- Store staff and managers see their store; a supervisor sees the own region in full and the
  other regions only as totals; headquarters and admins see the chain.
- Acknowledging and resolving an alert: the alert's level's people and those above, in scope
  (a manager only the own store's store-level alerts).
- Deciding a promotion: the manager of its store, or headquarters and admins.
- Customer data (names and symptoms) unmasked only to those who serve or follow up the customer:
  the store's people and the region's supervisor. Headquarters and admins work with figures and
  see names masked and symptoms withheld.
- A till (device token) reaches only its own store. It sees the symptoms its store recorded (the
  pharmacist reads them back at the counter) but names masked: a till token is shared by everyone
  at the till.

Only ingest and store_rules models are imported here (no service, no view), so the API, the
pages and the templates can all use it without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dashboard.deps import AuthenticatedDevice
from ingest.users import Principal
from store_rules.alerts.models import Alert
from store_rules.privacy import evidence_as_seen, mask_name, trace_as_seen
from store_rules.promotions.models import Promotion

CHAIN_ROLES = ("headquarters", "admin")
STORE_ROLES = ("staff", "manager")


@dataclass(frozen=True)
class Scope:
    """What a list may show: `store_ids` None means no store filter, `region_id` None no region filter."""

    store_ids: list[str] | None
    region_id: str | None


@dataclass(frozen=True)
class PersonPermissions:
    """What one signed-in person (page session or personal token) may see and do."""

    principal: Principal

    # --- the chain, regions and stores ------------------------------------------------------

    @property
    def chain_wide(self) -> bool:
        return self.principal.role in CHAIN_ROLES

    @property
    def is_supervisor(self) -> bool:
        return self.principal.role == "supervisor"

    @property
    def sees_chain(self) -> bool:
        """The chain overview, the morning report and the ranking (a supervisor's own stores in full)."""
        return self.chain_wide or self.is_supervisor

    @property
    def sees_rules(self) -> bool:
        return self.chain_wide or self.is_supervisor

    @property
    def sees_audit_log(self) -> bool:
        return self.chain_wide

    @property
    def sees_dead_letters(self) -> bool:
        """Raw payloads as tills and integrators sent them: admins only."""
        return self.principal.role == "admin"

    @property
    def home_region_id(self) -> str | None:
        """The region page a supervisor works from."""
        return self.principal.region_id if self.is_supervisor else None

    @property
    def home_store_id(self) -> str | None:
        """The store page a store's people work from (and land on instead of the chain overview)."""
        return self.principal.store_id if self.principal.role in STORE_ROLES else None

    def sees_region(self, region_id: str) -> bool:
        """The region page: its stores in detail and its alerts."""
        return self.chain_wide or (self.is_supervisor and region_id == self.principal.region_id)

    def sees_store(self, store_id: str, region_id: str) -> bool:
        """The full detail of a store: its page, receipts and traces, alerts and promotions."""
        if self.chain_wide:
            return True
        if self.is_supervisor:
            return region_id == self.principal.region_id
        return store_id == self.principal.store_id

    def scope(self) -> Scope:
        """The stores a list of alerts, promotions or figures may show: own store, own region or the chain."""
        if self.chain_wide:
            return Scope(None, None)
        if self.is_supervisor:
            return Scope(None, self.principal.region_id)
        return Scope([self.principal.store_id or ""], None)

    # --- receipts and customer data ---------------------------------------------------------

    def sees_receipt(self, store_id: str, region_id: str) -> bool:
        return self.sees_store(store_id, region_id)

    def sees_customer_names(self, store_id: str, region_id: str) -> bool:
        return not self.chain_wide and self.sees_store(store_id, region_id)

    def sees_symptoms(self, store_id: str, region_id: str) -> bool:
        return not self.chain_wide and self.sees_store(store_id, region_id)

    def trace(self, trace: dict[str, Any], store_id: str, region_id: str) -> dict[str, Any]:
        """A receipt's trace with the customer data this person may see."""
        return trace_as_seen(
            trace,
            names=self.sees_customer_names(store_id, region_id),
            symptoms=self.sees_symptoms(store_id, region_id),
        )

    def member_name(self, name: str | None, store_id: str, region_id: str) -> str | None:
        return name if self.sees_customer_names(store_id, region_id) else mask_name(name)

    # --- alerts -----------------------------------------------------------------------------

    def sees_alert(self, alert: Alert) -> bool:
        return self.sees_store(alert.store_id, alert.region_id)

    def may_act_on_alert(self, alert: Alert) -> bool:
        """Acknowledging and resolving: the level's people (and those above), in their scope."""
        if not self.sees_alert(alert):
            return False
        if self.chain_wide or self.is_supervisor:
            return True
        return self.principal.role == "manager" and alert.level == "store"

    def evidence_unmasked(self, alert: Alert) -> bool:
        return self.sees_customer_names(alert.store_id, alert.region_id) and self.sees_symptoms(
            alert.store_id, alert.region_id
        )

    def evidence(self, alert: Alert) -> list[dict[str, Any]]:
        """The alert's evidence with the customer data this person may see."""
        return evidence_as_seen(
            alert.evidence or [],
            names=self.sees_customer_names(alert.store_id, alert.region_id),
            symptoms=self.sees_symptoms(alert.store_id, alert.region_id),
        )

    # --- promotions -------------------------------------------------------------------------

    def sees_promotion(self, promotion: Promotion) -> bool:
        return self.sees_store(promotion.store_id, promotion.region_id)

    def may_decide_promotion(self, promotion: Promotion) -> bool:
        """Approve, reject or retract: only the manager of the promotion's store, or headquarters (and admins)."""
        return self.may_decide_for_store(promotion.store_id)

    def may_decide_for_store(self, store_id: str) -> bool:
        if self.chain_wide:
            return True
        return self.principal.role == "manager" and self.principal.store_id == store_id


@dataclass(frozen=True)
class DevicePermissions:
    """What a till (device token) may see: its own store, names masked."""

    device: AuthenticatedDevice

    def sees_store(self, store_id: str) -> bool:
        return store_id == self.device.store_id

    def sees_receipt(self, store_id: str) -> bool:
        return self.sees_store(store_id)

    def sees_customer_names(self, store_id: str) -> bool:
        return False

    def sees_symptoms(self, store_id: str) -> bool:
        return self.sees_store(store_id)

    def trace(self, trace: dict[str, Any], store_id: str) -> dict[str, Any]:
        return trace_as_seen(trace, names=self.sees_customer_names(store_id), symptoms=self.sees_symptoms(store_id))


def of_person(principal: Principal) -> PersonPermissions:
    return PersonPermissions(principal)


def of_device(device: AuthenticatedDevice) -> DevicePermissions:
    return DevicePermissions(device)
