"""Every controller of the node, in one list for `create_app`."""

from __future__ import annotations

from typing import Any

from wallet.api.app_cross_relationships import AppCrossRelationshipsController
from wallet.api.app_devices import AppDevicesController, OperatorDevicesController
from wallet.api.app_grants import AppGrantsController
from wallet.api.app_notifications import AppNotificationsController
from wallet.api.app_payments import AppPaymentCodesController
from wallet.api.app_relationships import AppRelationshipsController
from wallet.api.app_wallet import AppWalletController
from wallet.api.institution import InstitutionSettlementsController
from wallet.api.operator_clearing import OperatorClearingController
from wallet.api.operator_grants import OperatorGrantsController
from wallet.api.operator_institutions import (
    OperatorInstitutionsController,
    OperatorRelationshipsController,
)
from wallet.api.operator_people import OperatorPeopleController
from wallet.api.plt import PltController
from wallet.api.system import SystemController

ROUTE_HANDLERS: list[Any] = [
    SystemController,
    AppWalletController,
    OperatorPeopleController,
    AppRelationshipsController,
    AppPaymentCodesController,
    InstitutionSettlementsController,
    OperatorInstitutionsController,
    OperatorRelationshipsController,
    OperatorGrantsController,
    AppGrantsController,
    AppCrossRelationshipsController,
    PltController,
    OperatorClearingController,
    AppDevicesController,
    OperatorDevicesController,
    AppNotificationsController,
]
